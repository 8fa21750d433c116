//! The schema migrations of both stores: numbered SQL files under
//! `sqlite/` and `postgres/`, and the one runner that decides which of them
//! a database needs. Each store applies them in its own transactions (SQLite
//! synchronously, PostgreSQL under an advisory lock, so that processes
//! starting together do not race) and records the version reached:
//! `PRAGMA user_version` on SQLite, the `sagatx_schema` table on PostgreSQL.

use super::StoreError;

/// One migration: the SQL that takes the schema from `version - 1` to
/// `version`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The schema version the list takes a database to.
pub(crate) const fn latest(list: &[Migration]) -> i64 {
    list.len() as i64
}

/// The migrations a database at schema `current` needs, in order. A schema
/// newer than this build knows is refused: this build would not read it
/// right.
pub(crate) fn pending<'a>(
    list: &'a [Migration],
    current: i64,
    path: &str,
) -> Result<&'a [Migration], StoreError> {
    let known = latest(list);
    if current > known {
        return Err(StoreError::FutureSchema {
            path: path.to_string(),
            found: current,
            known,
        });
    }
    if current < 0 {
        return Err(StoreError::Foreign {
            path: path.to_string(),
            reason: format!("its schema version is {current}"),
        });
    }
    Ok(&list[current as usize..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(list: &[Migration]) {
        for (i, m) in list.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{} is out of order", m.name);
            assert!(!m.sql.trim().is_empty(), "{} is empty", m.name);
        }
    }

    #[test]
    fn both_lists_are_numbered_from_one_without_gaps() {
        numbered(crate::store::sqlite::MIGRATIONS);
        #[cfg(feature = "postgres")]
        numbered(crate::store::postgres::MIGRATIONS);
    }

    #[test]
    fn the_runner_applies_what_is_missing_and_refuses_the_future() {
        let list = [
            Migration {
                version: 1,
                name: "a",
                sql: "A",
            },
            Migration {
                version: 2,
                name: "b",
                sql: "B",
            },
        ];
        let names = |c| {
            pending(&list, c, "x")
                .map(|p| p.iter().map(|m| m.name).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        };
        assert_eq!(names(0), Ok(vec!["a", "b"]));
        assert_eq!(names(1), Ok(vec!["b"]));
        assert_eq!(names(2), Ok(vec![]));
        assert!(names(3).is_err_and(|e| e.contains("newer sagatx")));
        assert!(names(-1).is_err());
    }
}
