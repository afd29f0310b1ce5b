//! HTTP client of the payment gateway (being written).

use futures::future::BoxFuture;

use crate::config::PaymentSettings;
use crate::runtime::effects::EffectHandler;
use crate::stages::{Effect, EffectOutcome};

pub struct GatewayClient;

impl GatewayClient {
    pub fn new(_settings: &PaymentSettings) -> Result<Self, reqwest::Error> {
        Ok(GatewayClient)
    }
}

impl EffectHandler for GatewayClient {
    fn perform(&self, _effect: Effect) -> BoxFuture<'static, EffectOutcome> {
        Box::pin(async { EffectOutcome::Transient { error: "gateway client not written yet".into() } })
    }
}
