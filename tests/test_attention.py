import torch

from adapters.attention import KeyValueBranch, decoupled_attention


def naive_attention(query, key, value, heads):
    batch, n, width = query.shape
    d = width // heads
    q = query.reshape(batch, n, heads, d).transpose(1, 2)
    k = key.reshape(batch, -1, heads, d).transpose(1, 2)
    v = value.reshape(batch, -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, n, width)


def test_branch_matches_softmax_attention_with_per_row_tokens_and_scales():
    torch.manual_seed(0)
    branch = KeyValueBranch(token_dim=12, width=16)
    query = torch.randn(3, 5, 16)
    tokens = torch.randn(3, 4, 12)  # every row its own tokens
    scale = torch.tensor([1.0, 0.0, 2.5])
    out = branch(query, tokens, heads=4, scale=scale)
    expected = naive_attention(query, branch.to_k_ip(tokens), branch.to_v_ip(tokens), 4) * scale.reshape(-1, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out[1].abs().max() == 0


def test_one_row_of_tokens_broadcasts_over_the_batch():
    torch.manual_seed(1)
    query, key, value = torch.randn(4, 6, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    out = decoupled_attention(query, key, value, heads=2, scale=0.5)
    expected = naive_attention(query, key.expand(4, -1, -1), value.expand(4, -1, -1), 2) * 0.5
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
