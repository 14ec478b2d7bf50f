"""The ``vlp`` subcommands: their argparse parsers and the orchestration of library calls
(``vlp/cli.py`` imports only the module of the command being run). Library modules never
import from here."""
