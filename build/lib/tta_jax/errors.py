"""What counts as a user's error (one line on the command line), and how a bad config flag is told."""
from __future__ import annotations

import re

from tta_jax.checkpoints import CheckpointError
from tta_jax.hparams import HParamError, valid_keys

# Config, data and checkpoint problems raise these with a message naming the problem;
# the command line prints that message alone (``--debug`` shows the traceback).
USER_ERRORS = (HParamError, CheckpointError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError)


def _declared_keys(section: str) -> list[str] | None:
    """The valid keys of a declared config section (a method's sub-dict, ``adversarial``), else None."""
    from tta_jax.methods import available_methods, method_spec
    from tta_jax.source.adversarial import AdversarialHParams
    if section in available_methods():
        return valid_keys(method_spec(section).hparams)
    if section == "adversarial":
        return valid_keys(AdversarialHParams)
    return None


def describe_flag_error(error: Exception, argv) -> str:
    """One line for a failed ``--config.KEY=VALUE``: the key, and the valid keys of its section."""
    text = str(error)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    for path in overrides:
        *sections, key = path.split(".")
        if not re.search(rf"\b{re.escape(key)}\b", text):
            continue
        if f"'{key}'" in text or isinstance(error, (AttributeError, KeyError)):
            keys = _declared_keys(sections[0]) if len(sections) == 1 else None
            if keys is not None:
                return (f"{sections[0]}: unknown hyperparameter {key} (--config.{path}); "
                        f"valid keys: {', '.join(keys) or '(none)'}")
            return f"unknown config key --config.{path}"
        return f"--config.{path}: {text.splitlines()[0]}"
    return text.splitlines()[0] if text else type(error).__name__
