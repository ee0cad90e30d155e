//! Introspection and control over HTTP, for tests and demos:
//!
//! | method | path | body / answer |
//! |---|---|---|
//! | GET | `/sim/health` | `{"status":"ok","sessions":N,"active":N,"violations":N,"agent_version":"…"}` |
//! | GET | `/sim/sessions` | `[SessionSnapshot, …]`, oldest first |
//! | GET | `/sim/sessions/{id}` | one `SessionSnapshot`, or 404 |
//! | GET | `/sim/faults` | the current [`Faults`] |
//! | POST | `/sim/faults` | a [`Faults`] JSON (missing fields = no fault) replaces the knobs; answers the new value, or 400 |
//! | GET | `/sim/targets` | the [`TargetPolicy`] |
//! | POST | `/sim/targets` | `"any_valid"` or `{"only":["i-…"]}` replaces it |
//!
//! A `SessionSnapshot` is `{session_id, target, document, status, client_version,
//! client_id, owner, properties, start_unix_ms, end_unix_ms, attached, output,
//! exit_reason, counters, violations, cell_number, upgrades}`; `upgrades` lists every
//! websocket upgrade (cell-number, access key id, auth, accepted or why refused).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::faults::Faults;
use super::{Shared, TargetPolicy};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/sim/health", get(health))
        .route("/sim/sessions", get(sessions))
        .route("/sim/sessions/{id}", get(session))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .route("/sim/targets", get(get_targets).post(set_targets))
        .with_state(shared)
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let all = shared.all_sessions();
    let active = all.iter().filter(|s| s.status().is_active()).count();
    let violations: usize = all.iter().map(|s| s.report.violations().len()).sum();
    Json(json!({
        "status": "ok",
        "sessions": all.len(),
        "active": active,
        "violations": violations,
        "agent_version": shared.config.agent_version,
    }))
    .into_response()
}

async fn sessions(State(shared): State<Arc<Shared>>) -> Response {
    let list: Vec<_> = shared.all_sessions().iter().map(|s| s.snapshot()).collect();
    Json(list).into_response()
}

async fn session(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.session(&id) {
        Some(s) => Json(s.snapshot()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no session {id}")})),
        )
            .into_response(),
    }
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.faults()).into_response()
}

async fn set_faults(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    if let Err(e) = faults.validate() {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response();
    }
    tracing::info!(?faults, "fault knobs changed");
    *shared.faults_mut() = faults.clone();
    Json(faults).into_response()
}

async fn get_targets(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.targets().clone()).into_response()
}

async fn set_targets(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<TargetPolicy>(&body) {
        Ok(t) => {
            *shared.targets() = t.clone();
            Json(t).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
