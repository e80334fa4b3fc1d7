from fuse.cli import main

raise SystemExit(main())
