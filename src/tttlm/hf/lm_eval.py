"""``python -m tttlm.hf.lm_eval ARGS``: lm-evaluation-harness's own command line, with the
model type ``tttlm`` registered.

lm-eval's ``lm_eval`` script only knows the models of its own registry; ``tttlm`` joins it
when :mod:`tttlm.hf.harness` is imported, which lm-eval's script never does. This module
imports it and then runs lm-eval's entry point unchanged, so every lm-eval option works
(offline, NLTK downloads are refused as well: :func:`tttlm.hf.tasks.offline_nltk`)::

    python -m tttlm.hf.lm_eval --model tttlm --model_args pretrained=DIR --tasks hellaswag
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tttlm.errors import UserError, user_error

PROG = "python -m tttlm.hf.lm_eval"


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments). lm-eval
    exits itself on bad arguments (``SystemExit``, as its own script does); a bad setting of
    the tttlm model type is one line on stderr and exit status 2."""
    try:
        import lm_eval.__main__ as lm_eval_main

        import tttlm.hf.harness  # noqa: F401  (registers --model tttlm)
        from tttlm.hf.tasks import offline_nltk
    except ImportError as err:
        return user_error(f"{err}; lm-evaluation-harness and transformers come with pip "
                          "install 'tttlm[eval]'", PROG)
    except UserError as err:
        return user_error(str(err), PROG)

    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    # lm-eval's parser reads sys.argv itself (it inserts its `run` subcommand there).
    sys.argv = ["lm-eval", *args]
    try:
        with offline_nltk():
            lm_eval_main.cli_evaluate()
    except UserError as err:  # ours, from the tttlm model type: one line, as in tttlm's CLI
        return user_error(str(err), PROG)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
