//! docs/scaling.md's SQL, checked: every ```sql block applies, in order, to a fresh database
//! migrated to the current schema (plain PostgreSQL), and the ```sql citus block runs against
//! stubs carrying Citus's documented signatures (this machine has no Citus), so it at least
//! parses and names real tables and columns.

use crate::helpers::*;

/// The fenced blocks of `doc` whose info string is exactly `tag`.
fn blocks(doc: &str, tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        let fence = line.trim_start().starts_with("```");
        match &mut current {
            None if fence && line.trim_start().trim_start_matches('`').trim() == tag => {
                current = Some(String::new());
            }
            None => {}
            Some(_) if fence => {
                out.extend(current.take());
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
        }
    }
    out
}

const CITUS_STUBS: &str = r#"
CREATE SCHEMA citus_stub;
CREATE FUNCTION citus_stub.create_reference_table(table_name regclass) RETURNS void
  LANGUAGE sql AS $$ SELECT NULL::void $$;
CREATE FUNCTION citus_stub.create_distributed_table(table_name regclass, distribution_column text,
  distribution_type text DEFAULT 'hash', colocate_with text DEFAULT 'default',
  shard_count int DEFAULT NULL) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM pg_attribute WHERE attrelid = table_name AND attname = distribution_column AND NOT attisdropped;
  IF NOT FOUND THEN RAISE EXCEPTION 'no column % in %', distribution_column, table_name; END IF;
  IF colocate_with <> 'default' THEN PERFORM colocate_with::regclass; END IF;
END $$;
CREATE FUNCTION citus_stub.create_time_partitions(table_name regclass, partition_interval interval,
  end_at timestamptz, start_from timestamptz DEFAULT now()) RETURNS boolean
  LANGUAGE sql AS $$ SELECT true $$;
CREATE PROCEDURE citus_stub.drop_old_time_partitions(table_name regclass, older_than timestamptz)
  LANGUAGE sql AS $$ SELECT 1 $$;
SET search_path = public, citus_stub;
"#;

#[tokio::test]
async fn the_scaling_docs_schema_changes_apply_to_a_migrated_database() {
    let path = format!("{}/docs/scaling.md", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).expect("docs/scaling.md");
    let sql = blocks(&doc, "sql");
    let citus = blocks(&doc, "sql citus");
    assert!(
        sql.len() >= 4,
        "expected the schema blocks, found {}",
        sql.len()
    );
    assert_eq!(citus.len(), 1, "expected one Citus block");
    let url = fresh_database().await;
    let db = connect(&url).await;
    // Some data, so the backfills and new constraints meet rows.
    let s = seed_tenant(&db).await;
    seed_message_in(&db, &s).await;
    for (i, block) in sql.iter().enumerate() {
        if let Err(e) = db.batch_execute(block).await {
            panic!("docs/scaling.md sql block {} failed: {e:?}\n{block}", i + 1);
        }
    }
    // The keys are what Citus needs: the distribution column in every primary key.
    let rows = db
        .query(
            "SELECT c.conrelid::regclass::text FROM pg_constraint c
             WHERE c.contype IN ('p', 'u') AND c.connamespace = 'public'::regnamespace
               AND c.conrelid::regclass::text IN ('contacts', 'campaigns', 'campaign_messages', 'email_events')
               AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.conrelid
                 AND a.attnum = ANY (c.conkey) AND a.attname = 'organization_id')",
            &[],
        )
        .await
        .expect("constraints");
    let missing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        missing.is_empty(),
        "keys without organization_id: {missing:?}"
    );
    db.batch_execute(CITUS_STUBS).await.expect("stubs");
    if let Err(e) = db.batch_execute(&citus[0]).await {
        panic!("docs/scaling.md Citus block failed against the stubs: {e:?}");
    }
}
