"""tests/models: let pytest rewrite the asserts in the shared helpers module (informative failures)."""

import pytest

pytest.register_assert_rewrite("helpers")
