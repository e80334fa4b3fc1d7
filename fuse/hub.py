"""The Hugging Face Hub as fuse uses it: whether a push can happen (checked before any work) and the push itself.
The token comes from the environment or the user's login and is never logged.
"""

from __future__ import annotations

from pathlib import Path


def check_push_possible() -> None:
    """Fail before any work when a push cannot happen, not after minutes of copying and validating."""
    from huggingface_hub import get_token

    from fuse.models import offline

    if offline():
        raise RuntimeError(
            "stages.publish.push is true but offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set; "
            "`make` sets HF_HUB_OFFLINE=1 unless told otherwise)"
        )
    if not get_token():
        raise RuntimeError(
            "stages.publish.push is true but there is no Hugging Face token "
            "(set HF_TOKEN in the environment or run `hf auth login`)"
        )


def push(folder: Path, repo_id: str, private: bool, revision: str | None) -> str:
    """Upload with huggingface_hub; the token comes from the environment (HF_TOKEN) and is never logged."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message="Upload fused model (fuse)",
    )
    return str(getattr(commit, "commit_url", commit))
