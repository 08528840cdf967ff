"""Stand-in for transformers' tests/utils/test_configuration_utils.py: only what ConfigTester reads."""

# ConfigTester.check_config_can_be_init_without_params / the common-kwargs check returns early for composite
# configs (DynReferConfig has sub-configs), so the values here are never compared; a few generic ones suffice.
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
}
