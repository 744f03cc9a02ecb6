/*
 * Debian builds LLVM's libunwind (libunwind-14-dev) against glibc with _FORTIFY_SOURCE,
 * so its error paths call glibc's __fprintf_chk, which musl does not have. The musl
 * builds link that libunwind (std's backtraces and, in test builds, unwinding), so
 * cross/common.sh compiles this file into the same libunwind.a: the same output, without
 * glibc's format-string check. The release agent does not reach these paths; `cargo test
 * --target *-musl` does, and fails to link without it.
 */
#include <stdarg.h>
#include <stdio.h>

int __fprintf_chk(FILE *stream, int flag, const char *format, ...)
{
    va_list ap;
    int n;

    (void)flag;
    va_start(ap, format);
    n = vfprintf(stream, format, ap);
    va_end(ap);
    return n;
}
