/* pytest-sandbox init: pid 1 of a sandbox's pid namespace. It only reaps:
 * orphans of the test land here and must not stay zombies. The zygote kills it
 * (SIGKILL from the parent namespace) when the test process has ended, which
 * tears the namespace down. x86_64, no libc, position independent. */
        .globl _start
        .text
_start:
        xor     %edi, %edi              /* SIG_BLOCK */
        lea     mask(%rip), %rsi
        xor     %edx, %edx
        mov     $8, %r10d
        mov     $14, %eax               /* rt_sigprocmask: SIGCHLD stays pending while blocked */
        syscall
reap:
        mov     $-1, %rdi               /* any child */
        xor     %esi, %esi
        mov     $0x40000001, %edx       /* WNOHANG | __WALL */
        xor     %r10d, %r10d
        mov     $61, %eax               /* wait4 */
        syscall
        test    %rax, %rax
        jg      reap                    /* reaped one: look for more */
        lea     mask(%rip), %rdi
        xor     %esi, %esi
        xor     %edx, %edx
        mov     $8, %r10d
        mov     $128, %eax              /* rt_sigtimedwait: sleep until a child changes state */
        syscall
        jmp     reap
mask:   .quad   0x10000                 /* 1 << (SIGCHLD - 1) */
