"""How an image sits in a Lumina-mGPT / PURE token sequence, and how a generated one is read back (and repaired).

The layout (PURE `pure/data/item_processor.py`, `FlexARItemProcessor.process_image`): an image of h x w codes
(h = H / 8, w = W / 8 with the 8x VQ tokenizer) is

    <racm3:break>  <reserved{8800 + H/32}>  <reserved{8800 + W/32}>  (w codes, <reserved08799>) x h  <eoss>

so a 512 x 512 image is 3 + 64 * 65 + 1 = 4,164 tokens. One grid cell is 32 px, i.e. `codes_per_cell` = 4 codes of
the 8x tokenizer. Code c is the token Chameleon names "IMGIMG<digits of c as letters A-J>Z" (its `bpe2img`
rule); in PURE's extended vocabulary those are ids 4-8195 and 65536-73727.

`ImageTokenLayout.read` parses the tokens of a generated image. A well-formed image comes back as is; a broken one
(missing or invalid grid tokens, a row that is too short or too long, stray non-code tokens, missing rows or a
missing end token) is repaired row by row (rows split at the row-end tokens, each cut or filled to the width, missing
rows taken from `fallback` codes or repeated) and every repair is listed in `problems`, so the caller warns and
counts instead of crashing in the VQ decoder. No image at all is a `LayoutError` unless a fallback is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_modules.components.tokenizers import (
    IMAGE_END,
    IMAGE_START,
    MAX_GRID,
    ROW_END,
    TURN_END,
    grid_token,
    image_code_of,
)

CELL_PIXELS = 32  # one grid cell (PURE: patch_size = 32)


class LayoutError(ValueError):
    """A token sequence that holds no usable image (and no fallback was given)."""


@dataclass
class ReadImage:
    """A parsed image: codes [h, w] (int64), its grid in cells (gh, gw), and the repairs made (empty if well formed)."""

    codes: Tensor
    grid: tuple[int, int]
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageTokenLayout:
    """Token ids of the image structure and the code <-> id mapping of one vocabulary.

    Args:
        code_ids: [N] the token id of each code 0..N-1.
        image_start, image_end, row_end, turn_end: ids of <racm3:break>, <eoss>, <reserved08799>, <reserved08706>.
        grid_ids: [MAX_GRID + 1] the id of the grid-size token for 0..MAX_GRID cells.
        codes_per_cell: codes along one side of a 32 px grid cell (32 / the VQ's downsampling; PURE: 4).
    """

    code_ids: Tensor
    image_start: int
    image_end: int
    row_end: int
    turn_end: int
    grid_ids: Tensor
    codes_per_cell: int = 4

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, codebook_size: int, codes_per_cell: int = 4
    ) -> ImageTokenLayout:
        """The layout of a Chameleon-style tokenizer: codes from the IMGIMG token names, structure tokens by name.

        A ValueError names what the tokenizer lacks (a code token, a structure token).
        """
        code_ids = torch.full((codebook_size,), -1, dtype=torch.long)
        for token, token_id in tokenizer.get_vocab().items():
            code = image_code_of(token)
            if code is not None and code < codebook_size:
                code_ids[code] = token_id
        missing = (code_ids < 0).nonzero().flatten()
        if len(missing):
            raise ValueError(
                f"the tokenizer has no image-code token for {len(missing)} of the {codebook_size} codes (first: "
                f"code {int(missing[0])}); a Chameleon-style vocabulary names code c 'IMGIMG<c as letters A-J>Z' "
                f"(build one with build_tokenizer('chameleon', image_codes={codebook_size}))"
            )

        def token_id(token: str) -> int:
            found = tokenizer.convert_tokens_to_ids(token)
            if (
                found is None
                or found == tokenizer.unk_token_id
                or tokenizer.convert_ids_to_tokens(found) != token
            ):
                raise ValueError(
                    f"the tokenizer has no {token!r} token (needed by the Lumina-mGPT image layout)"
                )
            return int(found)

        grid_ids = torch.tensor([token_id(grid_token(n)) for n in range(MAX_GRID + 1)])
        return cls(
            code_ids=code_ids,
            image_start=token_id(IMAGE_START),
            image_end=token_id(IMAGE_END),
            row_end=token_id(ROW_END),
            turn_end=token_id(TURN_END),
            grid_ids=grid_ids,
            codes_per_cell=codes_per_cell,
        )

    @property
    def codebook_size(self) -> int:
        """Number of image codes."""
        return len(self.code_ids)

    def max_id(self) -> int:
        """The largest token id the layout uses (the LM's vocabulary must be larger)."""
        return int(
            max(self.code_ids.max(), self.grid_ids.max(), self.image_start, self.image_end, self.row_end)
        )

    def code_of_id(self, vocab_size: int) -> Tensor:
        """[vocab_size] the code of each token id, -1 for non-code tokens."""
        table = torch.full((vocab_size,), -1, dtype=torch.long)
        table[self.code_ids] = torch.arange(self.codebook_size)
        return table

    def code_mask(self, vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
        """[vocab_size] bool: which token ids are image codes."""
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[self.code_ids.to(device)] = True
        return mask

    def grid_of_id(self, vocab_size: int) -> Tensor:
        """[vocab_size] the cell count a grid-size token stands for, -1 for other tokens."""
        table = torch.full((vocab_size,), -1, dtype=torch.long)
        table[self.grid_ids] = torch.arange(len(self.grid_ids))
        return table

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(gh, gw) cells of an image of height x width codes; a ValueError if not whole cells or too many."""
        c = self.codes_per_cell
        if height % c or width % c or height < c or width < c:
            raise ValueError(
                f"an image of {height}x{width} codes is not a whole number of {c}x{c}-code grid cells "
                f"({CELL_PIXELS} px each): images must be at least {CELL_PIXELS} px and a multiple of it per side"
            )
        gh, gw = height // c, width // c
        if max(gh, gw) > MAX_GRID:
            raise ValueError(f"{gh}x{gw} grid cells: at most {MAX_GRID} per side have grid-size tokens")
        return gh, gw

    def length(self, height: int, width: int) -> int:
        """Tokens of one image of height x width codes: 3 + h (w + 1) + 1."""
        return 3 + height * (width + 1) + 1

    def encode(self, codes: Tensor) -> Tensor:
        """Codes [h, w] -> the image's token ids [3 + h (w + 1) + 1] (start, grid sizes, rows + row ends, end)."""
        h, w = codes.shape
        gh, gw = self.grid(h, w)
        ids = self.code_ids.to(codes.device)[codes.long()]
        rows = torch.cat([ids, torch.full((h, 1), self.row_end, device=codes.device)], dim=1).flatten()
        head = torch.tensor(
            [self.image_start, int(self.grid_ids[gh]), int(self.grid_ids[gw])], device=codes.device
        )
        return torch.cat([head, rows, torch.tensor([self.image_end], device=codes.device)])

    def read(
        self, ids: Sequence[int] | Tensor, grid: tuple[int, int] | None = None, fallback: Tensor | None = None
    ) -> ReadImage:
        """Parse the first image in `ids`, repairing a broken layout (see the module docstring).

        `grid` is the expected (gh, gw) when the grid tokens are missing or invalid; `fallback` codes [h, w] fill
        what a truncated image lacks (PURE restores at the input's size, so the input's codes are the natural fill).
        """
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        problems: list[str] = []
        code_of = {int(t): c for c, t in enumerate(self.code_ids.tolist())}
        grid_of = {int(t): n for n, t in enumerate(self.grid_ids.tolist())}
        if self.image_start not in ids:
            if fallback is None:
                raise LayoutError(
                    f"the generation holds no image (no image start token among {len(ids)} tokens)"
                )
            h, w = fallback.shape
            return ReadImage(
                fallback.clone(), self.grid(h, w), ["no image in the generation: the fallback is used"]
            )
        pos = ids.index(self.image_start) + 1
        sizes = [grid_of.get(t, -1) for t in ids[pos : pos + 2]]
        if len(sizes) == 2 and min(sizes) >= 1:
            gh, gw = sizes
            pos += 2
            if grid is not None and (gh, gw) != tuple(grid):
                problems.append(f"grid {gh}x{gw} differs from the expected {grid[0]}x{grid[1]}")
        elif grid is not None or fallback is not None:
            gh, gw = grid if grid is not None else self.grid(*fallback.shape)
            problems.append(f"invalid grid-size tokens {ids[pos : pos + 2]}: the expected {gh}x{gw} is used")
            pos += sum(1 for t in ids[pos : pos + 2] if t in grid_of)
        else:
            raise LayoutError(
                f"the image has no valid grid-size tokens ({ids[pos : pos + 2]}) and no grid is known"
            )
        height, width = gh * self.codes_per_cell, gw * self.codes_per_cell
        end = ids.index(self.image_end, pos) if self.image_end in ids[pos:] else None
        if end is None:
            problems.append("no image end token (the generation stopped inside the image)")
        body = ids[pos:end]
        rows: list[list[int]] = [[]]
        stray = 0
        for t in body:
            if t == self.row_end:
                rows.append([])
            elif t in code_of:
                rows[-1].append(code_of[t])
            else:
                stray += 1
        if not rows[-1]:
            rows.pop()  # the row end of the last row (or an empty body)
        if stray:
            problems.append(f"{stray} non-code token(s) inside the image were dropped")
        if len(rows) > height:
            problems.append(f"{len(rows)} rows instead of {height}: the extra rows were dropped")
            rows = rows[:height]
        codes = torch.empty(height, width, dtype=torch.long)
        fill = fallback if fallback is not None and tuple(fallback.shape) == (height, width) else None
        short = long = 0
        for r in range(height):
            row = rows[r] if r < len(rows) else []
            if len(row) > width:
                long += 1
                row = row[:width]
            if r < len(rows) and len(row) < width:
                short += 1
            if len(row) < width:
                if fill is not None:
                    rest = fill[r, len(row) :].tolist()
                elif row:
                    rest = [row[-1]] * (width - len(row))
                elif r > 0:
                    rest = codes[r - 1].tolist()
                else:
                    rest = [0] * width
                row = row + rest
            codes[r] = torch.tensor(row)
        if long:
            problems.append(f"{long} row(s) longer than {width} codes were cut")
        if short:
            problems.append(f"{short} row(s) shorter than {width} codes were filled")
        if len(rows) < height:
            source = "the fallback" if fill is not None else "repeated rows"
            problems.append(f"{height - len(rows)} missing row(s) of {height} were filled from {source}")
        return ReadImage(codes, (gh, gw), problems)
