"""The model under evaluation: any ``--model`` source of ``medclip-eval`` loaded, its errors as one input error.

Used by every evaluation command (``zeroshot``, ``retrieval``, ``linear-probe``, ``all``, ``suite``), so it lives
below the command modules rather than in one of them.
"""

from __future__ import annotations

from medclip_train.evaluation.errors import EvalInputError


def load_for_eval(source: str, pretrained: str | None, device: str, trust_remote_code: bool = False):
    """``model.loading.load_model`` (imported here: it is heavy and the CLI's ``--help`` should not need it).

    ``trust_remote_code`` is the ``--trust-remote-code`` flag only: nothing read from the model source turns it on.
    """
    from medclip_train.model.loading import load_model

    try:
        return load_model(source, device=device, pretrained=pretrained, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as err:  # unreadable checkpoint, unknown name, missing folder
        message = str(err)
        raise EvalInputError(message if message.startswith("--model") else f"--model {source}: {message}") from err
