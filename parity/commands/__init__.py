"""CLI subcommands: each module has run(args) -> exit code; their arguments live in the
framework-free parity.commands.arguments, so `parity --help` imports no framework."""
