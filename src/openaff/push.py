"""``openaff push DIR REPO``: upload a model folder to the Hugging Face Hub with ``huggingface_hub``.

A model folder is what ``openaff convert`` and ``openaff train`` write: ``config.json`` +
``model.safetensors`` (timm's hub layout) and the model card ``README.md``. Exactly those three files
are uploaded (a run folder's ``last.pt``, metrics and plots stay local), as timm's ``push_to_hf_hub``
uploads its own three, after which anyone loads the model with
``timm.create_model("hf-hub:REPO", pretrained=True)`` (after ``import openaff``).

Examples::

    openaff push runs/demo me/aff-cifar-resnet8-fashion-mnist --dry-run   # what would be uploaded
    openaff push runs/demo me/aff-cifar-resnet8-fashion-mnist --private

The token is huggingface_hub's (``hf auth login`` or ``HF_TOKEN``); ``HF_ENDPOINT`` selects another
Hub endpoint.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .errors import OpenAFFError, run_command
from .model_card import CARD_NAME

__all__ = ["PUSH_FILES", "PushError", "PushPlan", "plan_push", "push"]

PUSH_FILES = (hub.CONFIG_NAME, hub.WEIGHTS_NAME, CARD_NAME)
# The Hub's repository ids: "name" or "namespace/name", letters, digits, "-", "_", "." (no "--" or "..").
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class PushError(OpenAFFError):
    """A folder that is not a model folder, a bad repository id, no token, or an upload the Hub refused."""


@dataclass
class PushPlan:
    """What :func:`push` uploads: the folder, the repository, the files and their total size."""

    folder: Path
    repo_id: str
    files: tuple[str, ...]
    size: int

    def describe(self) -> str:
        return (f"{', '.join(self.files)} from {self.folder} ({self.size / 1e6:.1f} MB) to the model repository "
                f"{self.repo_id}")


def plan_push(folder: str | Path, repo_id: str) -> PushPlan:
    """Check that ``folder`` is a model folder and ``repo_id`` a Hub repository id; nothing touches the network.

    Raises:
        PushError: naming the missing file or the bad id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    missing = [name for name in PUSH_FILES if not (folder / name).is_file()]
    if missing:
        hint = (f"write the card with openaff convert or openaff train (the {CARD_NAME} model card)"
                if missing == [CARD_NAME] else "give a folder written by openaff convert or openaff train")
        raise PushError(f"{folder} is not a model folder: it has no {', '.join(missing)}; {hint}")
    try:
        hub._read_config(folder)
    except OpenAFFError as err:
        raise PushError(str(err)) from None
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise PushError(f"{repo_id!r} is not a Hugging Face repository id (NAMESPACE/NAME: letters, digits, '-', "
                        "'_', '.')")
    return PushPlan(folder, repo_id, PUSH_FILES, sum((folder / n).stat().st_size for n in PUSH_FILES))


def push(folder: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> str:
    """Create ``repo_id`` on the Hub if needed and upload the model folder's three files into it.

    Args:
        folder: a model folder (``config.json``, ``model.safetensors``, ``README.md``).
        repo_id: ``NAMESPACE/NAME`` (or ``NAME`` under the token's user).
        private: create the repository as private (an existing one keeps its visibility).
        commit_message: the Hub commit's message.

    Returns:
        The URL of the commit.

    Raises:
        PushError: not a model folder, a bad id, no token, or the Hub unreachable or refusing (one line).
    """
    from huggingface_hub import HfApi, constants, get_token

    plan = plan_push(folder, repo_id)
    if get_token() is None:
        raise PushError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    api = HfApi()
    try:
        api.create_repo(plan.repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=plan.repo_id, repo_type="model", folder_path=plan.folder,
                                 allow_patterns=list(plan.files),
                                 commit_message=commit_message or f"Upload {plan.folder.name} with openaff push")
    # huggingface_hub raises its HfHubHTTPError for refusals and the HTTP client's own errors (requests' before
    # 1.0, httpx's since) for an unreachable endpoint: every one of them means nothing was uploaded.
    except Exception as err:  # noqa: BLE001
        detail = " ".join(str(err).split()) or type(err).__name__
        raise PushError(f"upload to {constants.ENDPOINT}/{plan.repo_id} failed: {detail[:300]}") from None
    return str(getattr(info, "commit_url", info))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("push", help="upload a model folder (config.json, model.safetensors, README.md) to the "
                              "Hugging Face Hub", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR", help="a model folder written by openaff convert or openaff train")
    p.add_argument("repo", metavar="REPO", help="the Hub repository id, NAMESPACE/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", help="the Hub commit's message")
    p.add_argument("--dry-run", action="store_true", help="check the folder and print what would be uploaded")
    p.set_defaults(func=lambda args: run_command("openaff push", lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    plan = plan_push(args.folder, args.repo)
    if args.dry_run:
        print(f"would upload {plan.describe()}")
        return 0
    url = push(plan.folder, plan.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"uploaded {plan.describe()}: {url}")
    print(f'load with: timm.create_model("hf-hub:{plan.repo_id}", pretrained=True)  (after import openaff)')
    return 0
