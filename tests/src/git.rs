//! Git repositories for bundler tests, driven through the `git` CLI with a fixed author,
//! committer and date (configurable), and no system/global git configuration, so the
//! same content and dates always give the same commit ids.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::process::run_output;
use crate::require_program;

/// The date used for commits unless [`GitRepo::set_date`] changes it.
pub const DEFAULT_GIT_DATE: &str = "2024-01-01T00:00:00+0000";

/// A Git work tree (branch `main`).
#[derive(Debug, Clone)]
pub struct GitRepo {
    dir: PathBuf,
    date: String,
    author: (String, String),
}

impl GitRepo {
    /// `git init -b main` in `dir` (created if needed).
    pub fn init(dir: impl Into<PathBuf>) -> Result<GitRepo> {
        require_program("git")?;
        let dir = dir.into();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let repo = GitRepo {
            dir,
            date: DEFAULT_GIT_DATE.to_string(),
            author: ("Fleet Test".to_string(), "fleet-test@example.invalid".to_string()),
        };
        repo.git(&["init", "-q", "-b", "main"])?;
        Ok(repo)
    }

    /// Author and committer date of the following commits (any format `git` accepts,
    /// e.g. `"2024-05-01T12:00:00+0000"`).
    pub fn set_date(&mut self, date: &str) -> &mut Self {
        self.date = date.to_string();
        self
    }

    /// Author and committer identity of the following commits.
    pub fn set_author(&mut self, name: &str, email: &str) -> &mut Self {
        self.author = (name.to_string(), email.to_string());
        self
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes a file (creating parent directories); `path` is relative to the work tree.
    pub fn write(&self, path: &str, content: impl AsRef<[u8]>) -> Result<()> {
        let full = self.dir.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&full, content).with_context(|| format!("writing {}", full.display()))
    }

    /// Deletes a file or directory of the work tree.
    pub fn remove(&self, path: &str) -> Result<()> {
        let full = self.dir.join(path);
        if full.is_dir() { fs::remove_dir_all(&full) } else { fs::remove_file(&full) }
            .with_context(|| format!("removing {}", full.display()))
    }

    /// Stages everything (`git add -A`) and commits (empty commits allowed); returns the
    /// commit id.
    pub fn commit(&self, message: &str) -> Result<String> {
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "--allow-empty", "--no-verify", "-m", message])?;
        self.head()
    }

    /// The commit id of `HEAD`.
    pub fn head(&self) -> Result<String> {
        Ok(self.git(&["rev-parse", "HEAD"])?.trim().to_string())
    }

    /// Creates a lightweight tag at `HEAD`.
    pub fn tag(&self, name: &str) -> Result<()> {
        self.git(&["tag", name]).map(drop)
    }

    /// Runs `git args` in the work tree with the fixed identity and dates; returns stdout.
    pub fn git(&self, args: &[&str]) -> Result<String> {
        let (name, email) = &self.author;
        run_output(
            Command::new("git")
                .args(args)
                .current_dir(&self.dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_AUTHOR_NAME", name)
                .env("GIT_AUTHOR_EMAIL", email)
                .env("GIT_AUTHOR_DATE", &self.date)
                .env("GIT_COMMITTER_NAME", name)
                .env("GIT_COMMITTER_EMAIL", email)
                .env("GIT_COMMITTER_DATE", &self.date)
                .env_remove("GIT_DIR")
                .env_remove("GIT_WORK_TREE")
                .env_remove("GIT_INDEX_FILE"),
        )
    }
}
