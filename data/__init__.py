"""fuse.data: datasets, chat formatting, and the teacher log-prob store."""
