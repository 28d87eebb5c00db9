"""Sub-commands of `relprop`: parse arguments, build typed configs, call the library."""
