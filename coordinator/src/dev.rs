//! Generated credentials for `tailnetd dev`: one agent (id + token) and one user token that may
//! reach every agent, in the formats real Coder agents and clients send.
//!
//! Why: a newcomer can point a real Coder agent and CLI at a dev instance without a coderd. This
//! module must never be used to build credentials for a non-dev role.

use rand::distributions::Alphanumeric;
use rand::{CryptoRng, Rng, RngCore};
use serde::Serialize;
use uuid::Uuid;

use crate::auth::{AccessKeyword, AgentAccess, StaticAgent, StaticAuthConfig, StaticUser};

/// Credentials printed by `tailnetd dev`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DevCredentials {
    /// The agent's id (its peer id; clients dial `/api/v2/workspaceagents/<agent_id>/coordinate`).
    pub agent_id: Uuid,
    /// The agent token (a UUID, as Coder issues).
    pub agent_token: Uuid,
    /// A user session token in Coder's `<10 chars>-<22 chars>` form, allowed to reach every agent.
    pub client_token: String,
}

impl DevCredentials {
    /// Fresh random credentials from the thread RNG.
    pub fn generate() -> Self {
        Self::generate_with(&mut rand::thread_rng())
    }

    /// Fresh random credentials from `rng`.
    pub fn generate_with<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        let agent_id = uuid::Builder::from_random_bytes(b).into_uuid();
        rng.fill_bytes(&mut b);
        let agent_token = uuid::Builder::from_random_bytes(b).into_uuid();
        let id: String = (0..10).map(|_| rng.sample(Alphanumeric) as char).collect();
        let secret: String = (0..22).map(|_| rng.sample(Alphanumeric) as char).collect();
        Self {
            agent_id,
            agent_token,
            client_token: format!("{id}-{secret}"),
        }
    }

    /// The static auth configuration accepting exactly these credentials.
    pub fn auth_config(&self) -> StaticAuthConfig {
        StaticAuthConfig {
            agents: vec![StaticAgent {
                token: self.agent_token,
                id: self.agent_id,
                name: Some("dev-workspace-agent".into()),
            }],
            users: vec![StaticUser {
                token: self.client_token.clone(),
                name: Some("dev".into()),
                id: None,
                agents: AgentAccess::Keyword(AccessKeyword::Known),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Authenticator, StaticAuthenticator};

    #[tokio::test]
    async fn generated_credentials_authenticate() {
        let c = DevCredentials::generate();
        let (id, secret) = c.client_token.split_once('-').unwrap();
        assert_eq!((id.len(), secret.len()), (10, 22));
        let a = StaticAuthenticator::new(&c.auth_config()).unwrap();
        assert_eq!(
            a.agent(&c.agent_token.to_string()).await.unwrap().agent_id,
            c.agent_id
        );
        let u = a.user(&c.client_token).await.unwrap();
        assert!(a.user_may_reach(&u, c.agent_id).await.unwrap());
        // Only the generated agent: a dial to any other id is coderd's 404.
        assert!(!a.user_may_reach(&u, uuid::Uuid::new_v4()).await.unwrap());
        assert_ne!(DevCredentials::generate(), c);
    }
}
