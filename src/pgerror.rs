//! PostgreSQL errors as an operator needs to read them. tokio-postgres shows a server error
//! as "db error"; these helpers walk an error chain and render the server's severity,
//! SQLSTATE, message, detail, hint and the names of the schema objects involved, so a log
//! line says why. A check failure's detail ("Failing row contains ...") is the whole row
//! (addresses, user agents, payloads) and is never rendered. A leaf: the pipeline, the
//! database layer and the tools all use it.

/// The SQLSTATE of the first server error in `e`'s chain, if any (a log field and a metric
/// label source).
pub fn sqlstate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
            return Some(db.code().code().to_owned());
        }
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>()
            && let Some(db) = pg.as_db_error()
        {
            return Some(db.code().code().to_owned());
        }
        cur = err.source();
    }
    None
}

/// `e` and every error under it, joined by ": ", with a server error rendered in full:
/// `ERROR 55P03: canceling statement due to lock timeout (detail: ...; where: ...)`, except a
/// failing row's content. A link whose text the previous one already ends with (a wrapper
/// printing its source) is skipped.
pub fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(describe_db_error(db))
        } else if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            // Its Display is "db error"; the server error is its source, rendered next.
            pg.as_db_error().is_none().then(|| pg.to_string())
        } else {
            Some(err.to_string())
        };
        if let Some(text) = text.filter(|t| !t.is_empty() && !out.ends_with(t.as_str())) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = err.source();
    }
    out
}

fn describe_db_error(db: &tokio_postgres::error::DbError) -> String {
    let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    // A check or partition-constraint failure's detail is the whole row (addresses, user
    // agents, payloads): logs say which row failed by the constraint, never its content.
    let detail = db.detail().map(|d| {
        if d.starts_with("Failing row contains") {
            "Failing row contains (row data not logged)"
        } else {
            d
        }
    });
    let extras = [
        ("detail", detail),
        ("hint", db.hint()),
        ("where", db.where_()),
        ("schema", db.schema()),
        ("table", db.table()),
        ("column", db.column()),
        ("constraint", db.constraint()),
    ];
    let extras: Vec<String> = extras
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}: {v}")))
        .collect();
    if !extras.is_empty() {
        s.push_str(&format!(" ({})", extras.join("; ")));
    }
    s
}

/// A database error with its reason, as an `anyhow::Error` (see [`describe_error`]).
pub fn describe(e: tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!(describe_error(&e))
}

/// `e` with its whole chain rendered by [`describe_error`] ("expiring rows of the default
/// partition: ERROR 42501: permission denied for table email_events_default").
pub fn with_sqlstate(e: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(describe_error(e.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_error_chain_is_joined_and_has_no_sqlstate() {
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe_error(e.as_ref()), "outer: inner");
        assert_eq!(sqlstate(e.as_ref()), None);
        assert_eq!(format!("{}", with_sqlstate(e)), "outer: inner");
    }
}
