"""The commands of the `kdsearch` CLI, a module each (`common`: what they share); each command
takes the parsed arguments and returns an exit code.

Heavy modules (torch, Ray) are imported inside the commands, after the input is checked, so a
mistake in a recipe or a space is reported at once.
"""
