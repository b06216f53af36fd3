"""`saehook demo` runs offline and shows the steering effect it claims."""
import pytest

pytest.importorskip("transformers")


def test_demo_steering_raises_the_target_token(capsys):
    from saehook import demo

    out = demo.run(max_new_tokens=6)
    assert out["p_steered"] > 5 * out["p_clean"]
    assert out["steered"].count(demo.TARGET) > out["clean"].count(demo.TARGET)
    printed = capsys.readouterr().out
    assert "top features per token" in printed and "steered:" in printed
