"""One module per ``lorakit`` command: ``lorakit/commands/<name>.py``.

Each module has ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status).
Commands parse arguments and print; the work lives in the library modules.  ``lorakit.cli.COMMANDS`` lists them.
"""
