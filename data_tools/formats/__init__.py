"""One module per source format; `CONVERTERS` maps a format name to its row converter.

A converter takes `(raw row dict, row index, Context)` and returns a canonical row, or raises
`common.Reject(reason, message)` to have the row skipped, counted and listed in the rejects file.
"""

from . import captions, llava, messages, minimind

CONVERTERS = {
    "minimind": minimind.convert_row,
    "minimind-parquet": minimind.convert_row,
    "llava": llava.convert_row,
    "messages": messages.convert_row,
    "captions": captions.convert_row,
}
FORMATS = tuple(CONVERTERS)
