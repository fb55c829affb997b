"""Applications at the edge of the package: the command line, the demo, the embedded digits model and the
benchmark report. Nothing in the layers below imports them."""
