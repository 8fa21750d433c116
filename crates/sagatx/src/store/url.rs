//! Opening a store from a URL, as `sagatx serve --store` takes it.

use std::path::PathBuf;
use std::sync::Arc;

use super::{SqliteStore, Store, StoreError};

/// Where a store lives, parsed from `sqlite://PATH` (relative to the
/// working directory), `sqlite:///abs/path`, or `postgres://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() || path == "/" {
                return Err(StoreError::Open {
                    path: s.to_string(),
                    reason:
                        "the URL names no file; write sqlite://sagatx.db or sqlite:///abs/path.db"
                            .into(),
                });
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_string()));
        }
        Err(StoreError::Open {
            path: s.to_string(),
            reason: "not a store URL; use sqlite://PATH (relative), sqlite:///ABSOLUTE/PATH or postgres://…".into(),
        })
    }
}

/// Options of [`open_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct OpenOptions {
    /// PostgreSQL: how long a process's leases last unless renewed (by
    /// default 10 s).
    pub lease: Option<std::time::Duration>,
    /// SQLite: whether a lone write is committed by its caller
    /// ([`SqliteStoreBuilder::caller_commits`](super::SqliteStoreBuilder::caller_commits);
    /// by default yes).
    pub sqlite_caller_commits: Option<bool>,
}

impl OpenOptions {
    pub fn lease(mut self, d: std::time::Duration) -> Self {
        self.lease = Some(d);
        self
    }

    pub fn sqlite_caller_commits(mut self, on: bool) -> Self {
        self.sqlite_caller_commits = Some(on);
        self
    }
}

/// Opens the store a URL names.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, OpenOptions::default()).await
}

/// Opens the store a URL names, with options.
pub async fn open_with(url: &str, options: OpenOptions) -> Result<Arc<dyn Store>, StoreError> {
    match url.parse::<StoreUrl>()? {
        StoreUrl::Sqlite(path) => {
            let mut b = SqliteStore::builder(path);
            if let Some(on) = options.sqlite_caller_commits {
                b = b.caller_commits(on);
            }
            Ok(Arc::new(b.open()?))
        }
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(url) => {
            let mut o = super::PostgresOptions::default();
            if let Some(l) = options.lease {
                o.lease = l;
            }
            Ok(Arc::new(super::PostgresStore::open_with(&url, o).await?))
        }
        #[cfg(not(feature = "postgres"))]
        StoreUrl::Postgres(_) => Err(StoreError::Open {
            path: "postgres://…".to_string(),
            reason: "this build has no PostgreSQL support; build sagatx with the postgres feature"
                .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_as_the_cli_documents() {
        assert_eq!(
            "sqlite://sagatx.db".parse::<StoreUrl>().ok(),
            Some(StoreUrl::Sqlite("sagatx.db".into()))
        );
        assert_eq!(
            "sqlite:///var/lib/s.db".parse::<StoreUrl>().ok(),
            Some(StoreUrl::Sqlite("/var/lib/s.db".into()))
        );
        assert!(matches!(
            "postgres://u@h/db".parse::<StoreUrl>(),
            Ok(StoreUrl::Postgres(_))
        ));
        assert!("mysql://x".parse::<StoreUrl>().is_err());
        assert!("sqlite://".parse::<StoreUrl>().is_err());
    }
}
