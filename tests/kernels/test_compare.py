"""``python -m osft_kernels.compare`` (``make kernel-compare``): fused against naive on a small odd shape."""
from osft_kernels.compare import main


def test_compare_reports_matching_results(capsys):
    assert main(["--tokens", "61", "--hidden", "24", "--vocab", "333"]) == 0
    out = capsys.readouterr().out
    assert "device: CPU" in out and "tokens N=61, hidden D=24, vocab V=333" in out
    assert out.count("osft_kernels") >= 2 and "results match" in out
