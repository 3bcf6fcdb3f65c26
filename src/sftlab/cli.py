"""`sftlab <verb>`: parse the verb, call one stage function, turn user errors into one line and exit code 2."""

import sys

USAGE = """usage: sftlab [--debug] <verb> [args]

verbs:
  data    clean data and report what was wrong: sftlab data clean FILES... --output DIR
          look at a file as the model sees it:   sftlab data inspect FILE
  train   fine-tune a model (LoRA or full): sftlab train --config configs/demo.yaml [--field value ...]
  estimate  tokens, steps, memory and time of a run before launching it: sftlab estimate --config FILE
  eval    held-out metrics, before/after:   sftlab eval --adapter output/demo --compare-base
  doctor  check a run for template drift and stopping: sftlab doctor --adapter output/demo
  chat    chat with a base model or a run: sftlab chat --adapter output/demo [--prompt TEXT --json]
  merge   merge a LoRA run into its base for serving: sftlab merge --adapter output/demo [--output DIR]
  serve   an OpenAI-compatible server with a chat page: sftlab serve --adapter output/demo [--port 8000]

`sftlab <verb> --help` lists each verb's options. --debug shows tracebacks."""


def _train(argv):
    from sftlab.train.sft import main

    main(argv)
    return 0


def _estimate(argv):
    from sftlab.train.estimate import main

    return main(argv)


def _chat(argv):
    from sftlab.infer.chat import main

    return main(argv)


def _data(argv):
    from sftlab.data.commands import clean_main, inspect_main

    actions = {"clean": clean_main, "inspect": inspect_main}
    if not argv or argv[0] not in actions:
        print("usage: sftlab data {clean,inspect} ... (`sftlab data clean --help`)")
        return 2
    return actions[argv[0]](argv[1:])


def _eval(argv):
    from sftlab.eval.evaluate import main

    return main(argv)


def _doctor(argv):
    from sftlab.eval.doctor import main

    return main(argv)


def _merge(argv):
    from sftlab.train.merge import main

    return main(argv)


def _serve(argv):
    from sftlab.infer.serve import main

    return main(argv)


VERBS = {"data": _data, "train": _train, "estimate": _estimate, "eval": _eval, "doctor": _doctor, "chat": _chat,
         "merge": _merge, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from sftlab.errors import UserError, os_failure_line, report

    try:
        return VERBS[argv[0]](argv[1:])
    except UserError as exc:
        if debug:
            raise
        report(argv[0], exc)
        return 2
    except (OSError, RuntimeError) as exc:
        line = os_failure_line(exc)
        if debug or line is None:
            raise
        print(f"sftlab {argv[0]}: error: {line}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # before training installs its own handler (or after it): while a model loads
        if debug:
            raise
        print(f"sftlab {argv[0]}: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
