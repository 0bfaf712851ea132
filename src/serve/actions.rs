//! What an operator does to the running daemon — pause or resume a flow, send a dead letter
//! again — in one place, for the API (`POST /v1/flows/{id}/pause`, `POST
//! /v1/deadletters/{key}/retry`) and the web UI's buttons alike.

use canvas_engine::state::Time;
use canvas_engine::store::{Store as _, StoreError};

use super::App;
use crate::deadletters::{Refusal, send_again};

#[derive(Debug)]
pub enum ActionError {
    /// No such flow or outbox row.
    NotFound(String),
    /// The row is there but cannot be acted on now (not dead, fell back, a call).
    Conflict(String),
    Store(StoreError),
    /// The daemon could not apply the change to itself (the paused set's refresh failed).
    Unavailable,
}

impl From<StoreError> for ActionError {
    fn from(e: StoreError) -> ActionError {
        ActionError::Store(e)
    }
}

/// Pause (`paused`) or resume the loaded flow `id`: recorded in the database for every
/// daemon, applied to this one at once, and the engine woken.
pub async fn set_paused(app: &App, id: &str, paused: bool) -> Result<(), ActionError> {
    if app.engine().flows.get(id).is_none() {
        return Err(ActionError::NotFound(format!("no flow `{id}`")));
    }
    app.db.set_paused(id, paused, app.clock.now()).await?;
    app.refresh_paused().await.map_err(|e| {
        tracing::error!("refreshing paused flows: {e:#}");
        ActionError::Unavailable
    })?;
    app.wake.notify_one();
    Ok(())
}

/// Send the dead letter `key` again under its own idempotency key; the time it is due.
pub async fn retry_dead_letter(app: &App, key: &str) -> Result<Time, ActionError> {
    let now = app.clock.now();
    match send_again(&app.db, key, now).await? {
        Ok(()) => {}
        Err(why @ Refusal::Unknown(_)) => return Err(ActionError::NotFound(why.to_string())),
        Err(why) => return Err(ActionError::Conflict(why.to_string())),
    }
    tracing::info!(key, "dead letter sent again by an operator");
    app.outbox_wake.notify_one();
    Ok(now)
}
