//! The fulfillment stage (being written).

use super::{Ctx, Input, Stage, StageError};

pub struct FulfillmentStage {
    #[allow(dead_code)]
    settings: crate::config::FulfillmentSettings,
}

impl FulfillmentStage {
    pub fn new(settings: crate::config::FulfillmentSettings) -> Self {
        FulfillmentStage { settings }
    }
}

impl Stage for FulfillmentStage {
    type State = ();

    fn name(&self) -> &'static str {
        "fulfillment"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[]
    }

    fn process(&mut self, _ctx: &mut Ctx<'_, ()>, _input: Input<'_>) -> Result<(), StageError> {
        Ok(())
    }
}
