# GALA_CUDA_COMPILE_CHECK: compile every CUDA kernel source (csrc/cuda/*.cu) with nvcc, without
# torch and without a GPU, so that a CUDA syntax or type error never lands. Included by
# CMakeLists.txt, which returns right after; nothing here is linked into the extension.
#
#   cmake -S . -B build/cuda-check -DGALA_CUDA_COMPILE_CHECK=ON && cmake --build build/cuda-check
#
# The torch binding (*_binding.cpp) is not compiled here: it needs a CUDA build of torch.
set(GALA_CUDA_CHECK_ARCHS "80;90" CACHE STRING "Architectures the compile check builds for")

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  message(FATAL_ERROR "GALA_CUDA_COMPILE_CHECK: no CUDA compiler found (put nvcc on PATH or set CUDACXX)")
endif()
set(CMAKE_CUDA_ARCHITECTURES ${GALA_CUDA_CHECK_ARCHS})
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)

file(GLOB GALA_CUDA_CHECK_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu)
if(NOT GALA_CUDA_CHECK_SOURCES)
  message(FATAL_ERROR "GALA_CUDA_COMPILE_CHECK: no csrc/cuda/*.cu source found")
endif()

# Every warning is an error (nvcc front end and host compiler); ptxas reports register spills
# and per-kernel resource usage, which the build log shows for review.
add_library(gala_cuda_compile_check STATIC ${GALA_CUDA_CHECK_SOURCES})
target_include_directories(gala_cuda_compile_check PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
target_compile_options(gala_cuda_compile_check PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings -Xcompiler=-Wall -Xptxas=-warn-spills>)
message(STATUS "GALA_CUDA_COMPILE_CHECK: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "sm ${CMAKE_CUDA_ARCHITECTURES}, sources: ${GALA_CUDA_CHECK_SOURCES}")
