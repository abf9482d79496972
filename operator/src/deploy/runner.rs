//! The Python runner (`runner/` of the repository), carried inside the binary so
//! `fal-operator function serve` and `fal-operator local` need nothing but a python3:
//! the inspect script runs from memory, and `local` writes the package to its state dir.

use std::path::Path;

/// `runner/fal_runner/inspect_source.py`: read an `@isolated` function's arguments.
pub const INSPECT: &str = include_str!("../../../runner/fal_runner/inspect_source.py");

/// Every file of the runner: `(path under the runner dir, content)`.
pub const FILES: &[(&str, &str)] = &[
    (
        "fal_serverless/__init__.py",
        include_str!("../../../runner/fal_serverless/__init__.py"),
    ),
    (
        "fal_runner/__init__.py",
        include_str!("../../../runner/fal_runner/__init__.py"),
    ),
    (
        "fal_runner/__main__.py",
        include_str!("../../../runner/fal_runner/__main__.py"),
    ),
    ("fal_runner/inspect_source.py", INSPECT),
    (
        "fal_runner/build.py",
        include_str!("../../../runner/fal_runner/build.py"),
    ),
    (
        "fal_runner/serve.py",
        include_str!("../../../runner/fal_runner/serve.py"),
    ),
];

/// Writes the runner under `dir` (for PYTHONPATH).
pub fn materialize(dir: &Path) -> std::io::Result<()> {
    for (path, text) in FILES {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::read_to_string(&p).ok().as_deref() != Some(*text) {
            std::fs::write(&p, text)?;
        }
    }
    Ok(())
}
