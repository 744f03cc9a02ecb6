//! A bundle's secrets: decrypted with the device's identity (`state_dir/identity.age`)
//! right after the bundle verified, and merged into its state in memory. The identity is
//! read only when a bundle carries secrets, so an agent without any costs nothing.

use fleet_spec::model::UnsealError;
use fleet_spec::DesiredState;

use super::Agent;
use crate::engine::Engine;

/// Refusal code: the secrets are not encrypted to any key of this device.
pub const UNDECRYPTABLE: &str = "secrets_undecryptable";
/// Refusal code: the secrets decrypt, but are not a valid set for this state.
pub const INVALID: &str = "secrets_invalid";

impl<E: Engine> Agent<E> {
    /// Merges the state's sealed secrets into it; on failure the refusal code and reason.
    pub(super) fn unseal(&self, state: &mut DesiredState) -> Result<(), (&'static str, String)> {
        if state.sealed.is_empty() {
            return Ok(());
        }
        let path = self.cfg.state_dir.join(crate::identity::FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            let hint = "run `fleet-agent identity` and list its key in devices/<id>.yaml `public_key:`";
            (UNDECRYPTABLE, format!("the bundle carries secrets but {} cannot be read ({e}): {hint}", path.display()))
        })?;
        let keys = fleet_spec::age::parse_identities(&text)
            .map_err(|e| (UNDECRYPTABLE, format!("{}: {e}", path.display())))?;
        state.unseal(&keys).map_err(|e| match e {
            UnsealError::Decrypt(_) => {
                let ids: Vec<String> = keys.iter().map(|k| k.key_id()).collect();
                let reason = format!(
                    "{e}; this device's key ids: {} (is its current key in devices/{}.yaml `public_key:`?)",
                    ids.join(", "),
                    self.cfg.device
                );
                (UNDECRYPTABLE, reason)
            }
            UnsealError::Invalid(_) => (INVALID, e.to_string()),
        })
    }
}
