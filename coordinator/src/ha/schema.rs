//! Coder's tailnet HA tables: the start-up check and, in a database of tailnetd's own, the
//! migration that creates them.
//!
//! Why: in a database that coderd manages, coderd's migrations own `tailnet_coordinators`,
//! `tailnet_peers` and `tailnet_tunnels`; creating them first would make coderd's next migration
//! fail. So tailnetd only *checks* there that every column it reads and writes exists with the type
//! it expects, and refuses to start naming what is missing. A database is coderd's when it has
//! coderd's migration ledger `schema_migrations`. Otherwise the database is tailnetd's own, and
//! [`prepare`] creates the same definitions (the shape of Coder's migrations 000168, 000206, 000412
//! and 000483: UNLOGGED tables, hash indexes, no notify triggers) and records that in
//! `tailnetd_schema_migrations`.

use tokio_postgres::Client;

use super::HaError;

/// Every `(table, column, udt_name)` tailnetd reads or writes.
pub const REQUIRED_COLUMNS: &[(&str, &str, &str)] = &[
    ("tailnet_coordinators", "id", "uuid"),
    ("tailnet_coordinators", "heartbeat_at", "timestamptz"),
    ("tailnet_peers", "id", "uuid"),
    ("tailnet_peers", "coordinator_id", "uuid"),
    ("tailnet_peers", "updated_at", "timestamptz"),
    ("tailnet_peers", "node", "bytea"),
    ("tailnet_peers", "status", "tailnet_status"),
    ("tailnet_tunnels", "coordinator_id", "uuid"),
    ("tailnet_tunnels", "src_id", "uuid"),
    ("tailnet_tunnels", "dst_id", "uuid"),
    ("tailnet_tunnels", "updated_at", "timestamptz"),
];

/// tailnetd's own migration (only run in a database coderd does not manage).
const OWN_MIGRATION_1: &str = r#"
DO $$ BEGIN
    CREATE TYPE tailnet_status AS ENUM ('ok', 'lost');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
CREATE UNLOGGED TABLE IF NOT EXISTS tailnet_coordinators (
    id uuid NOT NULL PRIMARY KEY,
    heartbeat_at timestamp with time zone NOT NULL
);
CREATE UNLOGGED TABLE IF NOT EXISTS tailnet_peers (
    id uuid NOT NULL,
    coordinator_id uuid NOT NULL REFERENCES tailnet_coordinators(id) ON DELETE CASCADE,
    updated_at timestamp with time zone NOT NULL,
    node bytea NOT NULL,
    status tailnet_status DEFAULT 'ok'::tailnet_status NOT NULL,
    PRIMARY KEY (id, coordinator_id)
);
CREATE INDEX IF NOT EXISTS idx_tailnet_peers_coordinator ON tailnet_peers (coordinator_id);
CREATE UNLOGGED TABLE IF NOT EXISTS tailnet_tunnels (
    coordinator_id uuid NOT NULL REFERENCES tailnet_coordinators(id) ON DELETE CASCADE,
    src_id uuid NOT NULL,
    dst_id uuid NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    PRIMARY KEY (coordinator_id, src_id, dst_id)
);
CREATE INDEX IF NOT EXISTS tailnet_tunnels_src_id_idx ON tailnet_tunnels USING hash (src_id);
CREATE INDEX IF NOT EXISTS tailnet_tunnels_dst_id_idx ON tailnet_tunnels USING hash (dst_id);
"#;

/// Whether coderd manages this database (its migration ledger exists).
pub async fn coderd_managed(db: &Client) -> Result<bool, HaError> {
    let row = db
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?;
    Ok(row.get(0))
}

/// Columns from [`REQUIRED_COLUMNS`] that are absent or of another type, as `table.column type`.
pub async fn missing_columns(db: &Client) -> Result<Vec<String>, HaError> {
    let rows = db
        .query(
            "SELECT table_name::text, column_name::text, udt_name::text \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() \
               AND table_name IN ('tailnet_coordinators', 'tailnet_peers', 'tailnet_tunnels')",
            &[],
        )
        .await?;
    let present: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(REQUIRED_COLUMNS
        .iter()
        .filter(|(t, c, ty)| {
            !present
                .iter()
                .any(|(pt, pc, pty)| pt == t && pc == c && pty == ty)
        })
        .map(|(t, c, ty)| format!("{t}.{c} {ty}"))
        .collect())
}

/// Makes sure the tables are usable: checks them in a coderd-managed database, creates them in a
/// database of tailnetd's own, then checks.
pub async fn prepare(db: &Client) -> Result<(), HaError> {
    if !coderd_managed(db).await? {
        db.batch_execute(
            "CREATE TABLE IF NOT EXISTS tailnetd_schema_migrations (version integer PRIMARY KEY, \
             applied_at timestamp with time zone NOT NULL DEFAULT now())",
        )
        .await?;
        let done = db
            .query_opt(
                "SELECT 1 FROM tailnetd_schema_migrations WHERE version = 1",
                &[],
            )
            .await?
            .is_some();
        if !done {
            db.batch_execute(&format!(
                "BEGIN; {OWN_MIGRATION_1} \
                 INSERT INTO tailnetd_schema_migrations (version) VALUES (1) ON CONFLICT DO NOTHING; \
                 COMMIT;"
            ))
            .await?;
        }
    }
    let missing = missing_columns(db).await?;
    if !missing.is_empty() {
        return Err(HaError::Schema(missing.join(", ")));
    }
    Ok(())
}
