//! [`RecipeError`], the user error of every input check: what, where (file and key), how to
//! fix. The CLI maps it to exit status 2.

use std::path::PathBuf;

/// A user-facing recipe/inventory error: what, where (file and key), how to fix.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {problem}\n  fix: {fix}", file.display())]
pub struct RecipeError {
    pub file: PathBuf,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl RecipeError {
    pub fn new(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> RecipeError {
        RecipeError {
            file: file.into(),
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// The result of an input check.
pub type Result<T> = std::result::Result<T, RecipeError>;
