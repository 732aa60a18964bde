"""RedundancyAccumulator on a SpeechLLM: d(l, n) on the chosen tokens, Block Influence over all tokens."""
import pytest
import torch

from lightning_speechllm.redundancy.measure import RedundancyAccumulator
from lightning_speechllm.redundancy.metrics import AngularDistanceMetric, BlockInfluenceMetric, select_tokens
from tests.test_speechllm import make_batch
from tests.tiny_speechllm import tiny_speechllm


@pytest.mark.parametrize("selection", ["last", "last_prompt"])
def test_single_token_map_with_block_influence_over_all_tokens(selection):
    model = tiny_speechllm().eval()
    batch = make_batch()
    accumulator = RedundancyAccumulator(4, token_selection=selection)
    accumulator.update(model, batch)
    inputs = model.build_inputs(batch)
    with torch.no_grad(), model.layer_mask.record_residual_stream() as stream:
        model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                  position_ids=inputs.position_ids)
    angular, influence = AngularDistanceMetric(4), BlockInfluenceMetric(4)
    angular.update(stream.states, select_tokens(inputs.segment_ids, selection))
    influence.update(stream.states, select_tokens(inputs.segment_ids, "all"))
    result = accumulator.result(model_id="tiny", set_name="s", modality="speech")
    torch.testing.assert_close(torch.from_numpy(result.table), angular.compute(), equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(result.block_influence), influence.compute())
    assert result.extra["bi_token_selection"] == "all" and result.num_samples == 3
