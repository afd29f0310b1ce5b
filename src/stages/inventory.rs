//! The inventory stage (being written).

use super::{Ctx, Input, Stage, StageError};

pub struct InventoryStage {
    #[allow(dead_code)]
    settings: crate::config::InventorySettings,
}

impl InventoryStage {
    pub fn new(settings: crate::config::InventorySettings) -> Self {
        InventoryStage { settings }
    }
}

impl Stage for InventoryStage {
    type State = ();

    fn name(&self) -> &'static str {
        "inventory"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[]
    }

    fn process(&mut self, _ctx: &mut Ctx<'_, ()>, _input: Input<'_>) -> Result<(), StageError> {
        Ok(())
    }
}
