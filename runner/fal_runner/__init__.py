"""The Python runner of `fal-operator function serve`: `inspect` reads an `@isolated`
function's arguments from a file's syntax tree (nothing is executed), `build` makes the
environment of a requirements list once, `serve` runs the function on its port."""
