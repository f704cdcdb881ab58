-- The arrays of cantata_write_runs (0011) as one JSON document: for a batch of 8
-- shares or more the writer sends json_populate_record(NULL::cantata_write_args,
-- $1::json) instead of 69 array parameters. Encoding a Python list as a PostgreSQL
-- array costs the driver about a microsecond per element (a few hundred thousand
-- elements in 2,000 sagas); orjson writes the document in a small part of that, and
-- the server turns each field into its array in C. Values arrive exactly: text as
-- written, float8 from the shortest round-trip text, NULL from null (NaN and
-- infinities, which JSON cannot carry, go as arrays: postgres_onetrip._document).
CREATE TYPE cantata_write_args AS (
    n_run_id text[], n_app text[], n_workflow text[], n_status text[], n_args text[],
    n_created_at float8[], n_updated_at float8[], n_correlation_id text[],
    n_causation_id text[], n_idempotency_key text[], n_args_hash text[],
    n_parent_run_id text[], n_deadline_at float8[], n_result text[], n_error text[],
    n_cancel_requested bool[], n_owner text[], n_fence int8[], n_flagged bool[],
    n_service text[], n_version text[], n_epoch int4[],
    n_time float8[], n_tail text[], n_action text[], n_data text[], n_notice text[],
    k_app text[], k_run_id text[], k_fence int8[], k_status text[], k_result text[],
    k_error text[], k_flagged bool[], k_release bool[], k_i int4[], k_now float8,
    h_app text[], h_run_id text[], h_key text[], h_kind text[], h_name text[],
    h_status text[], h_seq int4[], h_result text[], h_error text[], h_error_type text[],
    h_attempts int4[], h_started_at float8[], h_ended_at float8[], h_wake_at float8[],
    h_detail text[],
    a_app text[], a_run_id text[], a_key text[], a_attempt int4[], a_started_at float8[],
    a_ended_at float8[], a_error_type text[], a_error text[],
    k_time float8[], k_time_json text[], k_same_action text[], k_same_data text[],
    k_same_rest text[], k_chg_action text[], k_chg_data text[], k_chg_rest text[],
    k_notice text[]
);
