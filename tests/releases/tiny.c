/* The process behind the release fixtures (tests/test_releases.py): small enough that its CRIU
 * images and the kernel's core of it can be committed. No libc (nothing mapped but itself, the
 * stack, vdso and vvar), two threads blocked in two different restartable syscalls, and memory
 * of each kind the images hold differently: private anonymous pages (pagemap + pages), a shared
 * anonymous page (pagemap-shmem), written .data and .bss of the binary.
 *
 * Build: gcc -nostdlib -static -O1 -fno-stack-protector -fno-asynchronous-unwind-tables \
 *            -Wl,--build-id=none -o tiny tiny.c
 * Prints "ready" once both threads are set up, then blocks until killed. */
#define SYS_read 0
#define SYS_write 1
#define SYS_mmap 9
#define SYS_pipe 22
#define SYS_pause 34
#define SYS_clone 56
#define SYS_exit 60

typedef unsigned long u64;

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall" : "=a"(ret) : "0"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

/* CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM */
#define THREAD_FLAGS 0x50f00

static long spawn(void *stack_top, void (*fn)(void))
{
	long ret;
	register long r10 __asm__("r10") = 0;
	register long r8 __asm__("r8") = 0;
	/* the child starts on its own stack and calls fn, which never returns */
	__asm__ volatile("syscall\n\t"
			 "test %%rax, %%rax\n\t"
			 "jnz 1f\n\t"
			 "call *%%rbx\n\t"
			 "1:"
			 : "=a"(ret)
			 : "0"(SYS_clone), "D"(THREAD_FLAGS), "S"(stack_top), "d"(0), "r"(r10), "r"(r8), "b"(fn)
			 : "rcx", "r11", "memory");
	return ret;
}

u64 data_words[1024] = {1, 2, 3};        /* .data: two pages of the file, one rewritten */
static u64 bss_words[1024];               /* .bss: two pages, one written */
static char thread_stack[16384] __attribute__((aligned(16)));
static int pipefd[2];
static volatile int thread_ready;

static void reader(void)
{
	char c;
	thread_ready = 1;
	sys6(SYS_read, pipefd[0], (long)&c, 1, 0, 0, 0); /* blocks: nobody writes */
	sys6(SYS_exit, 0, 0, 0, 0, 0, 0);
}

void _start(void)
{
	u64 *anon = (u64 *)sys6(SYS_mmap, 0, 3 * 4096, 3, 0x22, -1, 0);  /* PRIVATE|ANONYMOUS */
	u64 *shared = (u64 *)sys6(SYS_mmap, 0, 4096, 3, 0x21, -1, 0);    /* SHARED|ANONYMOUS */
	for (int i = 0; i < 3 * 512; i++)
		anon[i] = 0x5a5a000000000000ul ^ ((u64)&anon[i] * 0x9e3779b97f4a7c15ul);
	for (int i = 0; i < 512; i++) {
		shared[i] = 0xc0ffee00ul + i;
		data_words[512 + i] = (u64)i * 3 + 7;
		bss_words[i] = ~(u64)i;
	}
	sys6(SYS_pipe, (long)pipefd, 0, 0, 0, 0, 0);
	spawn(thread_stack + sizeof(thread_stack), reader);
	while (!thread_ready)
		;
	sys6(SYS_write, 1, (long)"ready\n", 6, 0, 0, 0);
	for (;;)
		sys6(SYS_pause, 0, 0, 0, 0, 0, 0);
}
