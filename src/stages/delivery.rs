//! The delivery stage (being written).

use super::{Ctx, Input, Stage, StageError};

pub struct DeliveryStage;

impl DeliveryStage {
    pub fn new() -> Self {
        DeliveryStage
    }
}

impl Default for DeliveryStage {
    fn default() -> Self {
        Self::new()
    }
}

impl Stage for DeliveryStage {
    type State = ();

    fn name(&self) -> &'static str {
        "delivery"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[]
    }

    fn process(&mut self, _ctx: &mut Ctx<'_, ()>, _input: Input<'_>) -> Result<(), StageError> {
        Ok(())
    }
}
