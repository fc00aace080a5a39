"""GRU encoder-decoder with additive attention (Bahdanau et al., 2015), in flax.nnx.

* The encoder is a bidirectional GRU over the source embeddings; each source position is
  described by the two directions' states side by side. Padding positions leave the state
  untouched, so the backward pass starts at the last real token.
* The decoder is a GRU whose input at each step is the previous target token's embedding
  and an attention context: a softmax-weighted sum of the encoder states, with weights
  ``v . tanh(W_query s + W_key h_j)`` (padding masked out) computed from the previous
  decoder state ``s``.
* Training uses teacher forcing (:meth:`Seq2Seq.__call__`); evaluation decodes greedily for a
  fixed number of steps (:meth:`Seq2Seq.greedy_decode`).

The recurrences run in ``jax.lax.scan``, so the traced program holds one step of each GRU
however long the sentences are, and compiles in seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from examples.seq2seq.data import BOS, PAD

CELLS = ("gru", "rnn")


def make_cell(kind: str, in_features: int, hidden_features: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """A GRU cell (``"gru"``, the default) or a vanilla tanh RNN cell (``"rnn"``)."""
    if kind == "gru":
        return nnx.GRUCell(in_features, hidden_features, rngs=rngs)
    if kind == "rnn":
        return nnx.SimpleCell(in_features, hidden_features, rngs=rngs)
    raise ValueError(f"cell must be one of {CELLS}, got {kind!r}")


class Encoder(nnx.Module):
    """Bidirectional GRU over source tokens."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        *,
        rngs: nnx.Rngs,
        cell: str = "gru",
    ):
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.forward_cell = make_cell(cell, embed_dim, hidden_dim, rngs=rngs)
        self.backward_cell = make_cell(cell, embed_dim, hidden_dim, rngs=rngs)
        self.hidden_dim = hidden_dim

    def _run(self, cell: nnx.Module, inputs: jax.Array, mask: jax.Array) -> tuple:
        """Scan ``cell`` over time-major ``inputs``; masked steps keep the previous state."""

        def step(state: jax.Array, step_input: tuple[jax.Array, jax.Array]):
            embedded, valid = step_input
            new_state, _ = cell(state, embedded)
            state = jnp.where(valid[:, None], new_state, state)
            return state, state

        initial = jnp.zeros((inputs.shape[1], self.hidden_dim), inputs.dtype)
        return jax.lax.scan(step, initial, (inputs, mask))

    def __call__(self, source: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encoder states ``(batch, length, 2 * hidden)``, final summary, source mask."""
        mask = source != PAD
        embedded = jnp.swapaxes(self.embed(source), 0, 1)  # time-major for scan
        time_mask = mask.T
        forward_last, forward_states = self._run(self.forward_cell, embedded, time_mask)
        backward_last, backward_states = self._run(
            self.backward_cell, embedded[::-1], time_mask[::-1]
        )
        states = jnp.concatenate([forward_states, backward_states[::-1]], axis=-1)
        summary = jnp.concatenate([forward_last, backward_last], axis=-1)
        return jnp.swapaxes(states, 0, 1), summary, mask


class AdditiveAttention(nnx.Module):
    """Bahdanau attention: score_j = v . tanh(W_query query + W_key key_j)."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int, *, rngs: nnx.Rngs):
        self.query_proj = nnx.Linear(query_dim, attention_dim, use_bias=False, rngs=rngs)
        self.key_proj = nnx.Linear(key_dim, attention_dim, rngs=rngs)
        self.score = nnx.Linear(attention_dim, 1, use_bias=False, rngs=rngs)

    def project_keys(self, keys: jax.Array) -> jax.Array:
        """``W_key h_j`` for every source position, computed once per sentence."""
        return self.key_proj(keys)

    def __call__(
        self, query: jax.Array, projected_keys: jax.Array, values: jax.Array, mask: jax.Array
    ) -> jax.Array:
        """Context vector ``(batch, value_dim)`` for a ``(batch, query_dim)`` query."""
        hidden = jnp.tanh(projected_keys + self.query_proj(query)[:, None, :])
        scores = self.score(hidden)[..., 0]
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bs,bsd->bd", weights, values)


class Decoder(nnx.Module):
    """GRU (or vanilla tanh RNN, ``cell="rnn"``) decoder reading the previous token and an
    attention context at each step."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        attention_dim: int,
        *,
        rngs: nnx.Rngs,
        cell: str = "gru",
    ):
        encoder_dim = 2 * hidden_dim
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.init_state = nnx.Linear(encoder_dim, hidden_dim, rngs=rngs)
        self.attention = AdditiveAttention(hidden_dim, encoder_dim, attention_dim, rngs=rngs)
        self.cell = make_cell(cell, embed_dim + encoder_dim, hidden_dim, rngs=rngs)
        self.readout = nnx.Linear(hidden_dim + encoder_dim + embed_dim, vocab_size, rngs=rngs)

    def initial_state(self, encoder_summary: jax.Array) -> jax.Array:
        return jnp.tanh(self.init_state(encoder_summary))

    def step(
        self,
        state: jax.Array,
        previous_tokens: jax.Array,
        encoded: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array]:
        """One decoding step: new state and logits over the target vocabulary."""
        states, projected_keys, mask = encoded
        embedded = self.embed(previous_tokens)
        context = self.attention(state, projected_keys, states, mask)
        state, _ = self.cell(state, jnp.concatenate([embedded, context], axis=-1))
        logits = self.readout(jnp.concatenate([state, context, embedded], axis=-1))
        return state, logits


class Seq2Seq(nnx.Module):
    """Encoder and decoder; attributes named so optimizer labels can split them."""

    def __init__(
        self,
        source_vocab_size: int,
        target_vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        attention_dim: int,
        *,
        rngs: nnx.Rngs,
        cell: str = "gru",
    ):
        self.encoder = Encoder(source_vocab_size, embed_dim, hidden_dim, rngs=rngs, cell=cell)
        self.decoder = Decoder(
            target_vocab_size, embed_dim, hidden_dim, attention_dim, rngs=rngs, cell=cell
        )

    def _encode(self, source: jax.Array) -> tuple[jax.Array, tuple]:
        states, summary, mask = self.encoder(source)
        encoded = (states, self.decoder.attention.project_keys(states), mask)
        return self.decoder.initial_state(summary), encoded

    def __call__(self, source: jax.Array, decoder_input: jax.Array) -> jax.Array:
        """Teacher-forced logits ``(batch, target_length, vocab)``."""
        state, encoded = self._encode(source)

        def step(state: jax.Array, previous_tokens: jax.Array):
            return self.decoder.step(state, previous_tokens, encoded)

        _, logits = jax.lax.scan(step, state, decoder_input.T)
        return jnp.swapaxes(logits, 0, 1)

    def greedy_decode(self, source: jax.Array, length: int) -> jax.Array:
        """Most likely token at each of ``length`` steps, feeding each back in."""
        state, encoded = self._encode(source)

        def step(carry: tuple[jax.Array, jax.Array], _):
            state, previous_tokens = carry
            state, logits = self.decoder.step(state, previous_tokens, encoded)
            tokens = jnp.argmax(logits, axis=-1).astype(previous_tokens.dtype)
            return (state, tokens), tokens

        start = jnp.full((source.shape[0],), BOS, dtype=source.dtype)
        _, tokens = jax.lax.scan(step, (state, start), None, length=length)
        return tokens.T


def masked_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean token cross-entropy over non-padding target positions."""
    mask = (target != PAD).astype(logits.dtype)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
