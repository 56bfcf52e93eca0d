//! sparkpost webhook: not implemented yet (issue 5). Until it is, the provider is never
//! registered, so `/webhooks/sparkpost` answers 404 like an unconfigured provider.

use std::sync::Arc;

use super::{HttpsGet, Provider};
use crate::config::WebhookArgs;

/// The provider if its secret is configured.
pub fn from_config(
    _cfg: &WebhookArgs,
    _https: &Arc<dyn HttpsGet>,
) -> Result<Option<Arc<dyn Provider>>, String> {
    Ok(None)
}
