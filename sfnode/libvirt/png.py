"""Screenshots: QEMU before 7.1 makes PPM, the API serves PNG."""

import struct
import zlib




PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

def ppm_to_png(ppm: bytes) -> bytes:
    """A binary PPM (P6, 8 bit) as PNG: QEMU before 7.1 only makes PPM screenshots."""
    fields, pos = [], 2
    if not ppm.startswith(b'P6'):
        raise ValueError('not a binary PPM')
    while len(fields) < 3:       # width, height, maxval; '#' starts a comment
        while ppm[pos:pos + 1].isspace():
            pos += 1
        if ppm[pos:pos + 1] == b'#':
            pos = ppm.index(b'\n', pos)
            continue
        end = pos
        while not ppm[end:end + 1].isspace():
            end += 1
        fields.append(int(ppm[pos:end]))
        pos = end
    width, height, maxval = fields
    if maxval != 255:
        raise ValueError('only 8-bit PPM is supported')
    pixels = ppm[pos + 1:pos + 1 + width * height * 3]
    stride = width * 3
    raw = b''.join(b'\0' + pixels[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))

    return (PNG_SIGNATURE + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw, 6)) + chunk(b'IEND', b''))

