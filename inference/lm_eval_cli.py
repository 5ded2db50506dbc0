"""mtp-lm-eval: lm-evaluation-harness's own command line, with this project's models registered as `mtplm`.

    mtp-lm-eval --model_args model=runs/1b/final,draft_heads=3 --tasks hellaswag,humaneval --batch_size 8 \\
        --output_path results/ --confirm_run_unsafe_code
    mtp-lm-eval ls tasks

Every option is lm-eval's (`mtp-lm-eval run --help`); `--model` defaults to mtplm. See
inference/lm_eval_model.py for the model arguments. A bad model_args, or anything lm-eval refuses with a
ValueError (a task not found), is one line (exit status 2).
"""

from __future__ import annotations

import sys

_SUBCOMMANDS = ("run", "ls", "validate")


def lm_eval_argv(argv: list[str]) -> list[str]:
    """lm-eval's arguments: `run` when no subcommand is given (as lm-eval does), and --model mtplm by default."""
    if argv and argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    if argv[:1] == ["run"] and not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = [*argv, "--model", "mtplm"]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        print("mtp-lm-eval: lm-evaluation-harness is not installed; pip install -e '.[eval]'", file=sys.stderr)
        return 2
    from .lm_eval_model import MTPLMError

    setup_logging()
    cli = HarnessCLI()
    cli._parser.prog = "mtp-lm-eval"
    sys.argv = ["mtp-lm-eval", *lm_eval_argv(argv)]
    args = cli.parse_args()
    try:
        cli.execute(args)
    except MTPLMError as e:
        print(f"mtp-lm-eval: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # lm-eval's own refusals (a task not found, a bad option): one line unless debugging
        if getattr(args, "verbosity", None) == "DEBUG":
            raise
        print(f"mtp-lm-eval: {e} (--verbosity DEBUG shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtp-lm-eval: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
