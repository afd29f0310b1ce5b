//! The payment stage (being written).

use super::{Ctx, Input, Stage, StageError};

pub struct PaymentStage {
    #[allow(dead_code)]
    settings: crate::config::PaymentSettings,
}

impl PaymentStage {
    pub fn new(settings: crate::config::PaymentSettings) -> Self {
        PaymentStage { settings }
    }
}

impl Stage for PaymentStage {
    type State = ();

    fn name(&self) -> &'static str {
        "payment"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[]
    }

    fn process(&mut self, _ctx: &mut Ctx<'_, ()>, _input: Input<'_>) -> Result<(), StageError> {
        Ok(())
    }
}
