/* pytest-sandbox init: pid 1 of a sandbox's pid namespace. x86_64, no libc, position independent.
 *
 * It is spawned (by the zygote, cheaply) before the test process exists, so it starts in the zygote's
 * namespaces; the test process (pid 2) builds the sandbox's own and then tells it to join them:
 *   fd 3: 4 bytes from the test process, the CLONE_NEW* flags of the namespaces to join
 *   fd 4: one byte back once it has joined them and given up every capability
 * From its first instruction it is not dumpable (the test can neither ptrace it nor open /proc/1/mem or
 * /proc/1/root); anything that fails ends it with status 127, which ends the sandbox. Then it only reaps:
 * orphans of the test land here and must not stay zombies. The zygote kills it (SIGKILL from the parent
 * namespace) when the test process has ended, which tears the namespace down. */
        .globl _start
        .text
_start:
        mov     $15, %edi               /* PR_SET_NAME: ps shows "sandbox-init", not the fd number it ran as */
        lea     name(%rip), %rsi
        xor     %edx, %edx
        xor     %r10d, %r10d
        xor     %r8d, %r8d
        mov     $157, %eax              /* prctl; it cannot fail with a valid pointer */
        syscall
        mov     $4, %edi                /* PR_SET_DUMPABLE */
        xor     %esi, %esi              /* 0: not dumpable */
        xor     %edx, %edx
        xor     %r10d, %r10d
        xor     %r8d, %r8d
        mov     $157, %eax              /* prctl */
        syscall
        test    %rax, %rax
        jnz     fail
        sub     $16, %rsp               /* the flags word, on the stack */
        mov     $3, %edi
        mov     %rsp, %rsi
        mov     $4, %edx
        xor     %eax, %eax              /* read(3, flags, 4): wait for the test process */
        syscall
        cmp     $4, %rax
        jne     fail
        cmpl    $0, (%rsp)              /* no flags: nothing to join (its own tests run it so) */
        je      lock
        mov     $2, %edi                /* pid 2, the test process, in this pid namespace */
        xor     %esi, %esi
        mov     $434, %eax              /* pidfd_open */
        syscall
        test    %rax, %rax
        js      fail
        mov     %rax, %r12              /* the pidfd */
        mov     %r12, %rdi
        mov     (%rsp), %esi            /* the flags */
        mov     $308, %eax              /* setns(pidfd, flags): every namespace at once */
        syscall
        test    %rax, %rax
        jnz     fail
        mov     %r12, %rdi
        mov     $3, %eax                /* close(pidfd) */
        syscall
lock:
        lea     cap_header(%rip), %rdi
        lea     cap_data(%rip), %rsi    /* all-zero effective, permitted, inheritable */
        mov     $126, %eax              /* capset */
        syscall
        test    %rax, %rax
        jnz     fail
        mov     $4, %edi
        lea     ack(%rip), %rsi
        mov     $1, %edx
        mov     $1, %eax                /* write(4, "1", 1): joined, nothing left to take */
        syscall
        cmp     $1, %rax
        jne     fail
        mov     $3, %edi
        mov     $3, %eax                /* close(3) */
        syscall
        mov     $4, %edi
        mov     $3, %eax                /* close(4) */
        syscall
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
        mov     $127, %edi
        mov     $231, %eax              /* exit_group */
        syscall
ack:    .byte   0x31                    /* "1" */
name:   .asciz  "sandbox-init"
mask:   .quad   0x10000                 /* 1 << (SIGCHLD - 1) */
cap_header:
        .long   0x20080522              /* _LINUX_CAPABILITY_VERSION_3 */
        .long   0                       /* this process */
cap_data:
        .quad   0, 0, 0                 /* two __user_cap_data_struct of three u32 each */
