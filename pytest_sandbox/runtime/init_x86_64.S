/* pytest-sandbox init: pid 1 of a sandbox's pid namespace. It only reaps:
 * orphans of the test land here and must not stay zombies. The zygote kills it
 * (SIGKILL from the parent namespace) when the test process has ended, which
 * tears the namespace down. x86_64, no libc, position independent.
 *
 * Before anything else it makes itself useless to the test it shares namespaces
 * with: not dumpable (the test can neither ptrace it nor open /proc/1/mem or
 * /proc/1/root) and without capabilities (as root, pid 1 would otherwise hold
 * every capability of the session's user namespace). */
        .globl _start
        .text
_start:
        mov     $4, %edi                /* PR_SET_DUMPABLE */
        xor     %esi, %esi              /* 0: not dumpable */
        xor     %edx, %edx
        xor     %r10d, %r10d
        xor     %r8d, %r8d
        mov     $157, %eax              /* prctl */
        syscall
        test    %rax, %rax
        jnz     fail
        lea     cap_header(%rip), %rdi
        lea     cap_data(%rip), %rsi    /* all-zero effective, permitted, inheritable */
        mov     $126, %eax              /* capset */
        syscall
        test    %rax, %rax
        jnz     fail
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
fail:
        mov     $127, %edi              /* a pid 1 that cannot lock itself down ends the sandbox */
        mov     $231, %eax              /* exit_group */
        syscall
mask:   .quad   0x10000                 /* 1 << (SIGCHLD - 1) */
cap_header:
        .long   0x20080522              /* _LINUX_CAPABILITY_VERSION_3 */
        .long   0                       /* this process */
cap_data:
        .quad   0, 0, 0                 /* two __user_cap_data_struct of three u32 each */
