"""Sub-commands of the `relprop` CLI; each module has `add_parser(subparsers)` and `run(args)`."""
