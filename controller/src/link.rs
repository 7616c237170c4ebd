//! The agent link: every call the controller makes to an agent goes through here.
//!
//! A call names the agent, the message and how long to wait; the answer is the agent's
//! message or one [`LinkError`]: offline (with when it was last seen), timeout, refused
//! (the agent answered with an error) or failed (the exchange broke, or the agent
//! answered something that is not an answer to the call). Today the session is in this
//! process's [`Registry`]; this is the seam where a later issue routes a call to the
//! controller replica that holds the agent's session.

use std::sync::Arc;
use std::time::Duration;

use surplus_protocol::Message;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::messages::ErrorReply;
use surplus_protocol::quic::{self, ExchangeError};
use uuid::Uuid;

use crate::registry::Registry;
use crate::store::RegistryStore;

/// Why a call to an agent did not bring its answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    /// The agent has no open session (or lost it during the call).
    #[error("agent {agent_id} is not connected ({})", seen(*last_seen_ms))]
    Offline {
        /// The agent.
        agent_id: Uuid,
        /// When it was last seen, if ever.
        last_seen_ms: Option<UnixMillis>,
    },
    /// The agent did not answer in time.
    #[error("agent {agent_id} did not answer within {after:?}")]
    Timeout {
        /// The agent.
        agent_id: Uuid,
        /// The limit.
        after: Duration,
    },
    /// The agent answered with an error.
    #[error("agent {agent_id} refused: {}", reply.message)]
    Refused {
        /// The agent.
        agent_id: Uuid,
        /// What it said.
        reply: ErrorReply,
    },
    /// The exchange broke, or the answer was not one to this call.
    #[error("agent {agent_id}: {message}")]
    Failed {
        /// The agent.
        agent_id: Uuid,
        /// What happened.
        message: String,
    },
}

fn seen(last_seen_ms: Option<UnixMillis>) -> String {
    last_seen_ms.map_or("never seen".to_owned(), |t| {
        format!("last seen at {t} ms since the epoch")
    })
}

impl LinkError {
    /// The agent answered `answer`, which is not an answer to `call`.
    pub fn unexpected(agent_id: Uuid, call: &str, answer: &Message) -> Self {
        Self::Failed {
            agent_id,
            message: format!("answered {} to {call}", answer.kind()),
        }
    }

    /// The agent the call was for.
    pub fn agent_id(&self) -> Uuid {
        match self {
            Self::Offline { agent_id, .. }
            | Self::Timeout { agent_id, .. }
            | Self::Refused { agent_id, .. }
            | Self::Failed { agent_id, .. } => *agent_id,
        }
    }
}

/// Calls agents by id.
#[derive(Debug, Clone)]
pub struct AgentLink {
    registry: Arc<Registry>,
    store: Arc<dyn RegistryStore>,
    max_frame: usize,
}

impl AgentLink {
    /// A link over the sessions in `registry`; `store` says when an offline agent was
    /// last seen.
    pub fn new(registry: Arc<Registry>, store: Arc<dyn RegistryStore>, max_frame: usize) -> Self {
        Self {
            registry,
            store,
            max_frame,
        }
    }

    /// Whether the agent has a session now.
    pub fn is_connected(&self, agent_id: Uuid) -> bool {
        self.registry.connection(agent_id).is_some()
    }

    /// Sends `message` and waits up to `timeout` for the answer.
    pub async fn call(
        &self,
        agent_id: Uuid,
        message: &Message,
        timeout: Duration,
    ) -> Result<Message, LinkError> {
        self.call_with_progress(agent_id, message, timeout, |_| false)
            .await
    }

    /// Sends `message` and reads answers for up to `timeout`: each answer for which
    /// `interim` returns true (progress) is passed to it and reading goes on; the first
    /// for which it returns false is the answer.
    pub async fn call_with_progress(
        &self,
        agent_id: Uuid,
        message: &Message,
        timeout: Duration,
        mut interim: impl FnMut(&Message) -> bool,
    ) -> Result<Message, LinkError> {
        let Some(conn) = self.registry.connection(agent_id) else {
            return Err(self.offline(agent_id).await);
        };
        let max = self.max_frame;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            quic::write_frame(&mut send, message, max).await?;
            loop {
                let answer = quic::read_frame(&mut recv, max).await?.message;
                if !interim(&answer) {
                    return Ok::<_, ExchangeError>(answer);
                }
            }
        };
        let outcome = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(ExchangeError::Timeout(timeout)));
        match outcome {
            Ok(Message::Error(reply)) => Err(LinkError::Refused { agent_id, reply }),
            Ok(answer) => Ok(answer),
            Err(ExchangeError::Timeout(after)) => Err(LinkError::Timeout { agent_id, after }),
            Err(ExchangeError::Connection(e)) => {
                tracing::info!(%agent_id, error = %e, "agent lost during a call");
                Err(self.offline(agent_id).await)
            }
            Err(e) => Err(LinkError::Failed {
                agent_id,
                message: e.to_string(),
            }),
        }
    }

    /// The error for an agent that is not connected, with when it was last seen.
    pub async fn offline(&self, agent_id: Uuid) -> LinkError {
        let last_seen_ms = self
            .store
            .agent(agent_id)
            .await
            .ok()
            .flatten()
            .and_then(|a| a.last_seen_ms);
        LinkError::Offline {
            agent_id,
            last_seen_ms,
        }
    }
}
