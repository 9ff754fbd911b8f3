"""The Hugging Face Hub: a repo's folder in the local cache, or downloaded by `selfextend pull`
(the one command that downloads), with every failure turned into one ModelNotFoundError line."""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..errors import ModelNotFoundError

# What an mlx-lm model needs from a Hub repo (code only when trust_remote_code asks for it).
HUB_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
OFFLINE_VALUES = ("1", "on", "yes", "true")


def offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in OFFLINE_VALUES or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_cache_dir() -> Optional[str]:
    """huggingface-hub's cache folder by its own rule (HF_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub). huggingface-hub reads these
    once, at import; they are read here at each call so a late setting (or HOME) counts."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path(os.environ.get("HOME") or Path.home()) / ".cache")
    return str(Path(cache) / "huggingface" / "hub")


@contextmanager
def _one_line_errors(repo: str, download: bool):
    """Hub failures as one ModelNotFoundError naming `repo` and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        yield
    except HFValidationError:
        raise ModelNotFoundError(f"{repo!r} is not a valid Hugging Face repo id (owner/name)") from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is a gated Hugging Face repo: accept its license on huggingface.co, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no Hugging Face repo named {repo} (or it is private)") from None
    except LocalEntryNotFoundError:
        if offline():
            raise ModelNotFoundError(
                f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it once online, or give a local folder or .gguf file"
            ) from None
        if not download:
            raise ModelNotFoundError(
                f"{repo} is not in the Hugging Face cache: `selfextend pull {repo}` downloads it"
            ) from None
        raise ModelNotFoundError(
            f"could not download {repo} from Hugging Face (no connection?) and it is not in the cache"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"could not download {repo} from Hugging Face: {first_line}") from None


def hub_snapshot(repo: str, *, download: bool = False, trust_remote_code: bool = False) -> Path:
    """The folder of a Hub repo in the local cache; with `download` (only `selfextend pull`
    asks), fetched first with a progress bar unless HF_HUB_OFFLINE forbids it."""
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    with _one_line_errors(repo, download):
        folder = snapshot_download(
            repo, allow_patterns=patterns, cache_dir=hub_cache_dir(), local_files_only=offline() or not download
        )
    return Path(folder)
