/*
 * fa_half.h - scalar conversions between float and the 16-bit storage types
 * (IEEE binary16 and bfloat16), with round-to-nearest-even, infinities, NaN
 * and subnormals handled.  Portable C; paths with F16C convert float16
 * vectors with it instead (fa_tile_impl.h).
 */
#ifndef FA_HALF_H
#define FA_HALF_H

#include <stdint.h>
#include <string.h>

static inline float fa_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t fa_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float fa_bf16_to_f32(uint16_t h) { return fa_bits_f32((uint32_t)h << 16); }

static inline uint16_t fa_f32_to_bf16(float f)
{
    const uint32_t u = fa_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float fa_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return fa_bits_f32(sign | 0x7f800000u | (man << 13)); /* inf, NaN */
    if (exp != 0) return fa_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
    /* zero and subnormals: man * 2^-24 is exact in float */
    const float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

static inline uint16_t fa_f32_to_f16(float f)
{
    const uint32_t u = fa_f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf */
    if (a < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        /* adding 0.5 (2^-1) aligns the half subnormal's last bit with float's
         * last mantissa bit, so the FPU does the rounding (to nearest even) */
        const float r = fa_bits_f32(a) + 0.5f;
        return (uint16_t)(sign | (uint16_t)(fa_f32_bits(r) - 0x3f000000u));
    }
    const uint32_t mant_odd = (a >> 13) & 1u;
    const uint32_t r = a + 0xc8000fffu + mant_odd; /* rebias exponent (-112 << 23) and round */
    return (uint16_t)(sign | (uint16_t)(r >> 13));
}

/* The 8-bit floats as float16 bit patterns: e5m2 is the top byte of a
 * float16; e4m3's exponent (bias 7) and mantissa, moved into a float16's
 * (bias 15), give 2^-8 times its value, subnormals included (its NaN, 0x7f,
 * reads as 480).  Multiply by FA_E4M3_UNIT to undo the 2^-8. */
#define FA_E4M3_UNIT 256.0f
static inline uint16_t fa_e5m2_f16_bits(uint8_t x) { return (uint16_t)(x << 8); }
static inline uint16_t fa_e4m3_f16_bits(uint8_t x) { return (uint16_t)(((x & 0x80u) << 8) | ((x & 0x7fu) << 7)); }

#endif /* FA_HALF_H */
