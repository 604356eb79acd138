"""tests/models: let pytest rewrite the asserts in the shared helper modules (informative failures)."""

import pytest

pytest.register_assert_rewrite("helpers", "backbone_cases")
